"""Test helpers shared by the client, daemon and end-to-end tests."""
