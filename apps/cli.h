// What every nextron command-line tool shares: option parsing without abbreviations and one way to report errors.
#pragma once

#include <boost/program_options.hpp>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <functional>
#include <iostream>
#include <optional>
#include <string>

namespace nextron::cli {

// Parses argv into vm. Abbreviations are off: a mistyped "--lr-warmup" must not silently mean "--lr-warmup-steps".
inline void parse(int argc, char** argv, const boost::program_options::options_description& options,
                  boost::program_options::variables_map& vm) {
  namespace po = boost::program_options;
  po::store(po::command_line_parser(argc, argv)
                .options(options)
                .style(po::command_line_style::default_style & ~po::command_line_style::allow_guessing)
                .run(),
            vm);
}

// parse(), then --help: prints the options and returns false (the tool exits 0); otherwise checks the required
// options and stores the values (po::notify) and returns true.
inline bool parse_or_help(int argc, char** argv, const boost::program_options::options_description& options,
                          boost::program_options::variables_map& vm) {
  parse(argc, argv, options, vm);
  if (vm.count("help")) {
    std::cout << options << "\n";
    return false;
  }
  boost::program_options::notify(vm);
  return true;
}

// `word` as a whole integer (a token id), or nothing when any of it is not one ("12x", "", "1e3", out of range).
inline std::optional<int64_t> parse_int64(const std::string& word) {
  size_t used = 0;
  try {
    const int64_t v = std::stoll(word, &used);
    if (used == word.size()) return v;
  } catch (const std::exception&) {
  }
  return std::nullopt;
}

// Runs body(); a bad option or any error is one line on stderr naming the tool, and exit code 1.
inline int run_main(const char* tool, const std::function<int()>& body) {
  try {
    return body();
  } catch (const boost::program_options::error& e) {
    std::fprintf(stderr, "%s: %s (see --help)\n", tool, e.what());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s: error: %s\n", tool, e.what());
  }
  return 1;
}

}  // namespace nextron::cli
