"""Quality seen through the runtimes: decode-time quality and which tokens each block runs."""
