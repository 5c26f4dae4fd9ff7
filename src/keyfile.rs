//! Keyring files (being implemented).
