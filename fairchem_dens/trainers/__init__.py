"""The DeNS trainer."""
