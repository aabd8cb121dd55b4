"""Clients of the served `sdxl` ensemble (run as scripts: python clients/sdxl_client.py)."""
