//! `dbops demo`: a local demo target (throwaway PostgreSQL and Redis filled with sample data).

pub mod seed;
mod serve;

pub use serve::run;
