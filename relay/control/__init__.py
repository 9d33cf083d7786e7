"""Control plane: agent links and registration, registration JWTs, the admin API and its
client."""
