"""The wire: tensor codecs, entropy coding, validation of what arrives, transport options,
long-lived frame streams and routes through chained workers. Imports contracts and models only."""
