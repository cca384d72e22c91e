"""Code shared by machined and importd: image names, the pool, locks, btrfs."""
