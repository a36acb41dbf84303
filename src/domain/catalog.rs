//! The apps catalog, held in memory.
//!
//! Every consume needs its app's id and `token_cost`; reading them from
//! Postgres per request would put the ledger on the hot path. The catalog
//! is small (tens of apps), so each API process holds all of it and
//! reloads it every few seconds and after every change it makes itself.
//! The listing (`GET /api/v1/apps`) is served from it too.

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
    /// `tokens_consumed_total{app_id}`, registered with the app: the
    /// consume path adds to it without looking a label up.
    pub tokens_consumed: metrics::Counter,
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

    /// Whether merchants may see and activate the app: never when
    /// disabled, and a beta app only with `ENABLE_BETA_APPS`. Hidden means
    /// not activatable either.
    pub fn is_offered(&self, include_beta: bool) -> bool {
        match self.row.status.as_str() {
            "disabled" => false,
            "beta" => include_beta,
            _ => true,
        }
    }
}

#[derive(Default)]
struct Snapshot {
    by_slug: HashMap<String, Arc<CatalogApp>>,
    /// Every app, by name: the listing's order.
    by_name: Vec<Arc<CatalogApp>>,
}

/// The listing's filters (API.md, `GET /api/v1/apps`).
#[derive(Debug, Default)]
pub struct Filter<'a> {
    pub category: Option<&'a str>,
    pub status: Option<&'a str>,
    pub pricing_tier: Option<&'a str>,
    /// Matched, case-insensitively, against the name and the description.
    pub q: Option<&'a str>,
    /// Whether beta apps are listed (`ENABLE_BETA_APPS`).
    pub include_beta: bool,
}

impl Filter<'_> {
    fn admits(&self, app: &CatalogApp, q: Option<&str>) -> bool {
        let row = &app.row;
        app.is_offered(self.include_beta)
            && self.category.is_none_or(|c| row.category == c)
            && self.status.is_none_or(|s| row.status == s)
            && self.pricing_tier.is_none_or(|t| row.pricing_tier == t)
            && q.is_none_or(|q| {
                row.name.to_lowercase().contains(q)
                    || row
                        .description
                        .as_deref()
                        .is_some_and(|d| d.to_lowercase().contains(q))
            })
    }
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
        // Ordered by name by the query.
        let rows = catalog::all_apps(pool).await?;
        let by_name: Vec<Arc<CatalogApp>> = rows
            .into_iter()
            .map(|row| {
                let tier = Tier::parse(&row.pricing_tier).unwrap_or(Tier::Enterprise);
                let tokens_consumed =
                    metrics::counter!("tokens_consumed_total", "app_id" => row.slug.clone());
                Arc::new(CatalogApp {
                    row,
                    tier,
                    tokens_consumed,
                })
            })
            .collect();
        let by_slug = by_name
            .iter()
            .map(|app| (app.row.slug.clone(), app.clone()))
            .collect();
        self.current.store(Arc::new(Snapshot { by_slug, by_name }));
        Ok(())
    }

    /// One page (from 1) of the apps the filter admits, by name, and how
    /// many it admits in all.
    pub fn list(
        &self,
        filter: &Filter<'_>,
        page: usize,
        per_page: usize,
    ) -> (Vec<Arc<CatalogApp>>, usize) {
        let q = filter.q.map(str::to_lowercase);
        let snapshot = self.current.load();
        let admitted: Vec<&Arc<CatalogApp>> = snapshot
            .by_name
            .iter()
            .filter(|app| filter.admits(app, q.as_deref()))
            .collect();
        let total = admitted.len();
        let page = admitted
            .into_iter()
            .skip(page.saturating_sub(1).saturating_mul(per_page))
            .take(per_page)
            .cloned()
            .collect();
        (page, total)
    }

    pub fn get(&self, slug: &str) -> Option<Arc<CatalogApp>> {
        self.current.load().by_slug.get(slug).cloned()
    }
}
