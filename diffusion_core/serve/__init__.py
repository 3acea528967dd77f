"""Generation as a service: AUTOMATIC1111's /sdapi/v1 HTTP API over DiffusionModel, and batches on Ray.

Needs the `[serve]` extra (FastAPI, uvicorn, prometheus-client); Ray Serve and Ray Data the `[ray]` extra.
"""
