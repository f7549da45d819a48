"""Readers for the pool formats curate ingests: webdataset tars, DataComp metadata, URL tables."""
