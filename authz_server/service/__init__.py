"""Application services: apply the domain rules, using SQL and the quota cache through ports."""
