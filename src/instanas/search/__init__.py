"""The search space as data, policies (which modules each image runs) and the search's
rewards."""
