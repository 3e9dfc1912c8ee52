"""Clusters of node groups (mixed GPU types and networks): the groups as homogeneous sub-clusters and the links
between them (groups.py), stages to groups and layers to stages by an ILP or a local search (assign.py), the
cost of a pipeline over groups (cost.py), the search with its baselines (search.py), the plan file's objects
and the explanation (report.py) and `meshplan plan` on node groups (command.py)."""
