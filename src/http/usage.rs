//! The dashboards' usage report.

use axum::extract::State;
use chrono::NaiveDate;
use serde::Deserialize;

use super::{auth::CustomerAuth, extract::Query};
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::{
    auth::Scope,
    domain::usage::{Reports, UsageReport},
    error::{ApiError, FieldError},
    state::Shared,
};

pub fn router() -> OpenApiRouter<Shared> {
    OpenApiRouter::new().routes(routes!(usage))
}

#[derive(Deserialize, utoipa::IntoParams)]
pub struct UsageQuery {
    /// First day (UTC) of `usage_by_app` and `daily_usage`, `YYYY-MM-DD`;
    /// default: the current period's first day.
    from: Option<String>,
    /// Last day, inclusive; default: the current period's last day. At
    /// most 366 days after `from`.
    to: Option<String>,
    /// `app`: each `daily_usage` entry also carries `apps`, its tokens by
    /// app (for a chart stacked by app). Without it the body is exactly the
    /// specification's.
    breakdown: Option<String>,
}

#[utoipa::path(get, path = "/api/v1/customer/tokens/usage", tag = "tokens",
    params(UsageQuery),
    responses((status = 200, description = "`current_period` is live; `usage_by_app` and `daily_usage` come from the daily aggregates, at most a second or two behind", body = UsageReport),
              (status = 422, description = "`from`/`to` not dates, out of order, or over 366 days apart; `breakdown` not `app`", body = crate::error::ErrorBody)),
    security(("bearer" = ["tokens:read"])))]
pub async fn usage(
    State(state): State<Shared>,
    auth: CustomerAuth,
    Query(query): Query<UsageQuery>,
) -> Result<axum::Json<UsageReport>, ApiError> {
    auth.require(Scope::TokensRead)?;
    let mut problems = Vec::new();
    let from = parse_date("from", query.from.as_deref(), &mut problems);
    let to = parse_date("to", query.to.as_deref(), &mut problems);
    let by_app = match query.breakdown.as_deref() {
        None => false,
        Some("app") => true,
        Some(_) => {
            problems.push(FieldError::new("breakdown", "must be `app`"));
            false
        }
    };
    if !problems.is_empty() {
        return Err(ApiError::Validation(problems));
    }
    let reports = Reports {
        hot: &state.hot,
        accounts: &state.accounts,
        db: &state.db,
    };
    Ok(axum::Json(
        reports.usage(auth.customer, from, to, by_app).await?,
    ))
}

fn parse_date(
    field: &str,
    value: Option<&str>,
    problems: &mut Vec<FieldError>,
) -> Option<NaiveDate> {
    let value = value?;
    match NaiveDate::parse_from_str(value, "%Y-%m-%d") {
        Ok(date) => Some(date),
        Err(_) => {
            problems.push(FieldError::new(field, "must be a date, YYYY-MM-DD"));
            None
        }
    }
}
