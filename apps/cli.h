// What every nextron command-line tool shares: option parsing without abbreviations and one way to report errors.
#pragma once

#include <boost/program_options.hpp>
#include <cstdio>
#include <exception>
#include <functional>
#include <iostream>

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
