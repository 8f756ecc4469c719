"""Planning: the pipeline graph, device inventory, stage profiles and placement.

May import networkx besides torch and numpy; never ray or fastapi at module level.
"""
