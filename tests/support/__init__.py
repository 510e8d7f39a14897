"""Helpers shared by the test suites: real processes on loopback, started and always stopped."""
