"""Privacy and security: DP accounting, the update codec, end-to-end encryption and secure aggregation.

These modules depend on numpy, opacus (accounting only) and cryptography — never on Flower — so the federation
calls them and tests exercise them without a running federation.
"""
