"""The applications' commands: each parses its flags and calls its app's library function."""
