"""Coherence: write leases with fencing tokens, single-flight, read pins, tenants."""
