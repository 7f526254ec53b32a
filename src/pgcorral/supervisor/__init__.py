"""The main process: configuration, listening sockets, signals, reload and shutdown."""
