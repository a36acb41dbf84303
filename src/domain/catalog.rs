//! The apps catalog, held in memory.
//!
//! Every consume needs its app's id and `token_cost`; reading them from
//! Postgres per request would put the ledger on the hot path. The catalog
//! is small (tens of apps), so each API process holds all of it and
//! reloads it every few seconds and after every change it makes itself.

use std::{collections::HashMap, sync::Arc};

use arc_swap::ArcSwap;
use sqlx::PgPool;

use crate::ledger::catalog::{self, AppRow};

/// Plans and apps are ordered by tier: a plan opens the apps of its tier
/// and below.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Tier {
    Starter,
    Professional,
    Enterprise,
}

impl Tier {
    pub fn parse(s: &str) -> Option<Tier> {
        Some(match s {
            "starter" => Tier::Starter,
            "professional" => Tier::Professional,
            "enterprise" => Tier::Enterprise,
            _ => return None,
        })
    }
}

#[derive(Debug)]
pub struct CatalogApp {
    pub row: AppRow,
    pub tier: Tier,
}

impl CatalogApp {
    pub fn slug(&self) -> &str {
        &self.row.slug
    }

    pub fn token_cost(&self) -> i64 {
        i64::from(self.row.token_cost)
    }

    pub fn is_disabled(&self) -> bool {
        self.row.status == "disabled"
    }
}

#[derive(Default)]
struct Snapshot {
    by_slug: HashMap<String, Arc<CatalogApp>>,
}

#[derive(Default)]
pub struct Catalog {
    current: ArcSwap<Snapshot>,
}

impl Catalog {
    pub async fn load(pool: &PgPool) -> sqlx::Result<Self> {
        let catalog = Catalog::default();
        catalog.refresh(pool).await?;
        Ok(catalog)
    }

    pub async fn refresh(&self, pool: &PgPool) -> sqlx::Result<()> {
        let rows = catalog::all_apps(pool).await?;
        let by_slug = rows
            .into_iter()
            .map(|row| {
                let tier = Tier::parse(&row.pricing_tier).unwrap_or(Tier::Enterprise);
                (row.slug.clone(), Arc::new(CatalogApp { row, tier }))
            })
            .collect();
        self.current.store(Arc::new(Snapshot { by_slug }));
        Ok(())
    }

    pub fn get(&self, slug: &str) -> Option<Arc<CatalogApp>> {
        self.current.load().by_slug.get(slug).cloned()
    }
}
