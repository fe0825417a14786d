"""Content processors, one per content type, looked up through ``registry``."""
