"""The ledger writer: the decision journal's and the audit trail's SQL in a process of its own
(MEDWALLET_LEDGER_WRITER=process), so a gRPC worker spends its GIL on calls (loadtest/
RESULTS.md, "What SQL inside the gRPC process costs"). `protocol` frames the messages,
`writer` is the process, `client` the worker's side."""
