"""kvgate tests."""
