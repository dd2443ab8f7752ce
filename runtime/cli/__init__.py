"""The one ``edgesplit`` console command: the only package that imports both runtime and planner."""
