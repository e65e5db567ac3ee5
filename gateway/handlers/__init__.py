"""HTTP handlers: thin — parse the request, call the ``Gateway``, respond."""
