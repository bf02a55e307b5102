"""Hugging Face providers: the Inference API client (serverless, endpoints, TGI) and local
transformers models.
"""
