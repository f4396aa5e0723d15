//! Integration tests: the real server on a real PostgreSQL. One binary, one module a feature.

mod health;
mod helpers;
mod lifecycle;
