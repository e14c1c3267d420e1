"""Helpers the tests share. Test modules import from here, never from one another."""
