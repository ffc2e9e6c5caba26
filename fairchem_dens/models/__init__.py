"""DeNS models built on fairchem's EquiformerV2 (and eSCN) modules."""
