"""The planner fleet load generator (``edgesplit bench-planner-fleet``, ``make bench-fleet``).

Simulated agents over real gRPC against a real ``edgesplit planner`` daemon started as a
subprocess: :mod:`.options` (what to run), :mod:`.profiles` (board types from the bundled profiles),
:mod:`.planner_proc` (the daemon, its CPU and RSS), :mod:`.agent` (one simulated agent),
:mod:`.loader` (a loader process: many agents over a few channels), :mod:`.run` (the run),
:mod:`.replicas` (several planners on one PostgreSQL store, one killed: ``--replicas``),
:mod:`.postgres` (a throw-away PostgreSQL server), :mod:`.gcpauses` (``--gc-pauses``) and
:mod:`.report` (figures, JSON and markdown). Uses only runtime modules (never planner/).
"""
