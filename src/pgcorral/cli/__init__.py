"""Command-line front ends: argument parsing and rendering only."""
