"""The kvgate HTTP gateway (aiohttp), its CLI, config and client."""
