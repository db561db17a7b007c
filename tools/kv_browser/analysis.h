// The queries of kv-browser. Each returns the JSON document that `--json`
// prints (field names are documented in docs/kv-browser.md); the text
// renderers and the terminal UI read the same documents.
#ifndef CKPTKV_TOOLS_KV_BROWSER_ANALYSIS_H_
#define CKPTKV_TOOLS_KV_BROWSER_ANALYSIS_H_

#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "tools/kv_browser/browser_core.h"
#include "tools/kv_browser/values.h"

namespace ckptkv::kvb {

using json = nlohmann::ordered_json;

// Which parameters a query covers: glob (default) or ECMAScript regex over
// the param path, optionally in one file.
struct ParamFilter {
  std::string pattern;  // empty = all
  bool regex = false;
  std::string file;  // empty = every file
  Result<bool> Matches(const TensorEntry& e) const;
};

// { dtype, shape, numel, bytes } of a tensor.
json TensorBrief(const TensorEntry& e);
// Placement fields that are set, by name.
json PlacementJson(const fb::Placement* p);

Result<json> TagsReport(Browser& b);
Result<json> TreeReport(Browser& b, const std::string& tag, const ParamFilter& filter);
Result<json> ShowReport(Browser& b, const std::string& tag, const std::string& file,
                        const std::string& param);

// Streams a tensor in windows of about one chunk; `fn(value)` per element.
// `progress` (may be null) gets the bytes read.
class Progress;
Status ForEachValue(Browser& b, const TensorEntry& e, const std::function<void(double)>& fn,
                    Progress* progress = nullptr);
Result<Summary> Summarize(Browser& b, const TensorEntry& e, Progress* progress = nullptr);
json SummaryJson(const Summary& s);

Result<json> StatsReport(Browser& b, const std::string& tag, const ParamFilter& filter);
Result<json> HistReport(Browser& b, const TensorEntry& e, size_t bins);
// `slice` is numpy-style ("0:2, :, -1"); empty = the first `limit` values.
Result<json> PeekReport(Browser& b, const TensorEntry& e, const std::string& slice, size_t limit);
Result<json> DiffReport(Browser& b, const std::string& tag_a, const std::string& tag_b,
                        const ParamFilter& filter);
Result<json> HistoryReport(Browser& b, const std::string& param, const std::string& file);
Result<json> MetaReport(Browser& b, const std::string& tag, const std::string& file,
                        bool with_tensors);
// by: "tag", "file" or "param-prefix" (depth components of the param path).
Result<json> DuReport(Browser& b, const std::string& by, int depth);
// Every tag when `tags` is empty. ok=false when a problem was found.
// One verifier for kv-browser and ckptkv (Store::Verify): the report as
// JSON (docs/kv-browser.md lists its fields), with a progress bar on a
// terminal. `repair` needs a writable store.
json VerifyReportJson(const VerifyReport& r);
// What gc removed (or, with dry_run, would remove), as `gc --json` prints it.
json GcJson(const GcStats& g, bool dry_run);
Result<json> VerifyStore(const Store& store, const std::optional<std::string>& tag, bool repair);
Result<json> VerifyTags(Browser& b, const std::vector<std::string>& tags);

}  // namespace ckptkv::kvb

#endif  // CKPTKV_TOOLS_KV_BROWSER_ANALYSIS_H_
