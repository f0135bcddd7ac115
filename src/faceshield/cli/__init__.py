"""The faceshield command line."""
