// The terminal UI's model: the lists it navigates (tags, then files, then
// parameters) and the text of its detail pane, built from the query core.
// Drawing and keys are in tui.cc; this part has no ncurses in it.
#ifndef CKPTKV_TOOLS_KV_BROWSER_TUI_H_
#define CKPTKV_TOOLS_KV_BROWSER_TUI_H_

#include <set>
#include <string>
#include <vector>

#include "tools/kv_browser/analysis.h"

namespace ckptkv::kvb {

struct TuiRow {
  std::string key;    // tag, file or param
  std::string label;  // the text shown
  uint64_t bytes = 0;
};

enum class TuiLevel { kTags, kFiles, kParams };
enum class TuiSort { kName, kSize, kOrder };

class TuiModel {
 public:
  explicit TuiModel(Browser& b) : b_(b) {}

  TuiLevel level = TuiLevel::kTags;
  std::string tag, file;  // the tag / file entered
  std::string filter;     // substring, or glob when it has * ? [
  TuiSort sort = TuiSort::kOrder;
  std::set<std::string> marked;  // tags marked for diff

  // Rows of the current level, filtered and sorted.
  Result<std::vector<TuiRow>> Rows();
  // Detail pane lines for the selected row (stats and histogram of a
  // parameter are computed here, streaming its bytes).
  std::vector<std::string> Detail(const TuiRow& row, int width);
  // Title of the current level ("tags", "step3", "step3 / file").
  std::string Where() const;
  // Text of a diff of the two marked tags, and of a verify.
  std::vector<std::string> DiffLines();
  std::vector<std::string> VerifyLines(const std::string& only_tag);
  static std::vector<std::string> HelpLines();
  const char* SortName() const;

 private:
  Browser& b_;
};

// Runs the terminal UI (drawn by tui.cc) on the store; returns the exit code.
int RunTui(const std::string& db);

}  // namespace ckptkv::kvb

#endif  // CKPTKV_TOOLS_KV_BROWSER_TUI_H_
