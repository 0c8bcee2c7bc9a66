"""Looking at flows: the user's handle, the inspect document and its drawings, the
registry statistics."""
