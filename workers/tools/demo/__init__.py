"""`fleet demo`: a sample lifecycle program, a synthetic event stream, a summary and a report."""
