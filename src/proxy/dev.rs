//! `countersign dev`. (being implemented)
