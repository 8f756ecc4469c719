"""Planning: device inventory, stage profiles and placement of the pipeline graph (`hetforge.spec.graph`).

May import networkx besides torch and numpy; never ray or fastapi at module level.
"""
