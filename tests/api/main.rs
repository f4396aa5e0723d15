//! Integration tests: the real server on a real PostgreSQL. One binary, one module a feature.

mod analytics;
mod auth;
mod backup;
mod budgets;
mod cli;
mod cluster;
mod commands;
mod console;
mod contacts;
mod enrollments;
mod faults;
mod fuzz;
mod health;
mod helpers;
mod hostile;
mod layers;
mod lifecycle;
mod lists;
mod openapi;
mod privacy;
mod projections;
mod providers;
mod rebuild;
mod replica;
mod store;
mod webhooks;
