//! Integration tests: the real server on a real PostgreSQL. One binary, one module a feature.

mod analytics;
mod auth;
mod budgets;
mod cli;
mod commands;
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
mod projections;
mod rebuild;
mod store;
mod subscriptions;
mod webhooks;
