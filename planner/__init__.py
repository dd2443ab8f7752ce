"""edgesplit planner: split search and plan distribution (see issue 4). Nothing here yet."""
