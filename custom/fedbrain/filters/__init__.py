"""What crosses the wire: filters a site or the server applies to task data and results."""
