"""The chunksync benchmark: real image pairs, the real server and client, baseline delta tools (`python -m bench`)."""
