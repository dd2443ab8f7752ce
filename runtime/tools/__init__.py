"""Tools that are not part of the shipped runtime's import graph: Transfer Layer training and
sweeps, the digits trainer and the link-emulating relay. Only the CLI imports them."""
