"""Reporting: the nightly metrics that feed dashboards and the AARRR funnel."""
