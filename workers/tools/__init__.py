"""Tools around the fleet, not part of it: benchmarks, fault injection and the demo.

They run scratch fleets on a developer's machine or CI; the production image
leaves this package out, and `fleet` registers their commands only where it exists.
"""
