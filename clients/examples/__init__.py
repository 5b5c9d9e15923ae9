"""Runnable payment flows against a running service (by default `medwallet-authz serve --demo`):

python -m clients.examples.pharmacy_checkout --address localhost:50051
python -m clients.examples.hospital_discharge --address localhost:50051
python -m clients.examples.resident_premium --address localhost:50051 [--premium-fen 400000]
"""
