"""pgcorral: a connection pool for PostgreSQL, compatible with pgagroal's files and commands."""

__version__ = "0.1.0"
