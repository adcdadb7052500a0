using System;
using System.Collections.Generic;
using System.Text;
using System.Text.RegularExpressions;

namespace Zyke
{
    /// <summary>One thing in an NPC definition the daemon would refuse, and what was done about it.</summary>
    public sealed class SpecProblem
    {
        /// <summary>True when the game's value was dropped or changed (log it as an error); false when a
        /// missing value got a default (a warning).</summary>
        public bool IsError;
        public string Message;

        public override string ToString() { return Message; }
    }

    /// <summary>
    /// Turns editor-typed NPC values into a definition the daemon accepts, saying what it changed: an id made
    /// from a GameObject name ("Brom (1)" becomes "brom_1"), a default persona for an empty one, invalid or
    /// repeated labels left out, a default action or emotion that is not in the lists left out, text cut to the
    /// protocol's lengths. Pure logic without the engine, so the Mono tests run it.
    /// </summary>
    public static class NpcSpecRepair
    {
        /// <summary>The persona used for an empty one; {0} is the NPC's name.</summary>
        public const string DefaultPersonaFormat = "{0}, a character in this game. Speaks briefly and stays in character.";
        public const int MaxIdLength = 64;
        public const int MaxLabels = 64;
        public const int MaxNameLength = 64;
        public const int MaxPersonaLength = 4000;
        public const int MaxDescriptionLength = 200;

        static readonly Regex IdPattern = new Regex(ProtocolConstants.NpcIdPattern);
        static readonly Regex LabelPattern = new Regex(ProtocolConstants.LabelPattern);
        static readonly Regex NotIdChars = new Regex("[^a-z0-9_.-]+");

        /// <summary>Whether the daemon accepts this NPC id (letters, digits, _ . -, 1 to 64, not only dots).</summary>
        public static bool IsValidId(string id)
        {
            return id != null && IdPattern.IsMatch(id) && id.Trim('.').Length > 0 && !id.EndsWith("\n", StringComparison.Ordinal);
        }

        public static bool IsValidLabel(string label)
        {
            return label != null && LabelPattern.IsMatch(label) && !label.EndsWith("\n", StringComparison.Ordinal);
        }

        /// <summary>A valid id made from any text: lower case, runs of other characters as "_", at most 64
        /// characters, "npc" when nothing is left. "Brom (1)" -> "brom_1".</summary>
        public static string ValidId(string raw)
        {
            string id = NotIdChars.Replace((raw ?? "").Trim().ToLowerInvariant(), "_").Trim('_');
            if (id.Length > MaxIdLength) id = id.Substring(0, MaxIdLength).TrimEnd('_');
            return id.Trim('.').Length == 0 ? "npc" : id;
        }

        /// <summary>A copy of <paramref name="spec"/> the daemon accepts; <paramref name="problems"/> (may be null)
        /// receives one entry per change. <paramref name="shownName"/> names the NPC in a default persona.</summary>
        public static NpcSpec Repair(NpcSpec spec, string shownName = null, List<SpecProblem> problems = null)
        {
            if (spec == null) throw new ArgumentNullException("spec");
            var found = problems ?? new List<SpecProblem>();
            var fixedSpec = new NpcSpec
            {
                Id = spec.Id, Name = spec.Name, Persona = spec.Persona, DefaultOptions = spec.DefaultOptions,
                Adapter = spec.Adapter, MaxHistory = spec.MaxHistory,
                BlockedWords = spec.BlockedWords == null ? null : new List<string>(spec.BlockedWords),
                Record = spec.Record,
            };
            if (!IsValidId(fixedSpec.Id))
            {
                string id = ValidId(fixedSpec.Id);
                Error(found, "npcId \"" + fixedSpec.Id + "\" is not a valid id (letters, digits, _ . - only, at most "
                             + MaxIdLength + "); using \"" + id + "\"");
                fixedSpec.Id = id;
            }
            string name = (fixedSpec.Name ?? "").Trim();
            if (name.Length > MaxNameLength)
            {
                Error(found, "displayName is over " + MaxNameLength + " characters; cut");
                name = name.Substring(0, MaxNameLength);
            }
            fixedSpec.Name = name.Length == 0 ? null : name;
            string persona = (fixedSpec.Persona ?? "").Trim();
            if (persona.Length == 0)
            {
                persona = string.Format(DefaultPersonaFormat,
                    fixedSpec.Name ?? (string.IsNullOrEmpty(shownName) ? fixedSpec.Id : shownName));
                found.Add(new SpecProblem { IsError = false, Message = "persona is empty; using \"" + persona + "\"" });
            }
            else if (persona.Length > MaxPersonaLength)
            {
                Error(found, "persona is over " + MaxPersonaLength + " characters; cut");
                persona = persona.Substring(0, MaxPersonaLength);
            }
            fixedSpec.Persona = persona;
            Labels(spec.Actions, spec.ActionDescriptions, "actions", "none", fixedSpec.Actions, fixedSpec.ActionDescriptions, found);
            Labels(spec.Emotions, spec.EmotionDescriptions, "emotions", "neutral", fixedSpec.Emotions, fixedSpec.EmotionDescriptions, found);
            fixedSpec.DefaultAction = Default(spec.DefaultAction, fixedSpec.Actions, "defaultAction", "actions", found);
            fixedSpec.DefaultEmotion = Default(spec.DefaultEmotion, fixedSpec.Emotions, "defaultEmotion", "emotions", found);
            fixedSpec.RefusalAction = Default(spec.RefusalAction, fixedSpec.Actions, "refusalAction", "actions", found);
            if (!string.IsNullOrEmpty(spec.Audience) && Array.IndexOf(ProtocolConstants.AllAudiences, spec.Audience) < 0)
                Error(found, "audience \"" + spec.Audience + "\" is not one of minor, teen, adult; left out");
            else if (!string.IsNullOrEmpty(spec.Audience))
                fixedSpec.Audience = spec.Audience;
            if (fixedSpec.MaxHistory.HasValue && (fixedSpec.MaxHistory < 0 || fixedSpec.MaxHistory > 200))
            {
                Error(found, "maxHistory " + fixedSpec.MaxHistory + " is outside 0..200; clamped");
                fixedSpec.MaxHistory = Math.Max(0, Math.Min(200, fixedSpec.MaxHistory.Value));
            }
            return fixedSpec;
        }

        static void Labels(List<string> names, Dictionary<string, string> descriptions, string field, string fallback,
                           List<string> into, Dictionary<string, string> intoDescriptions, List<SpecProblem> found)
        {
            foreach (string raw in names ?? new List<string>())
            {
                string label = (raw ?? "").Trim();
                if (!IsValidLabel(label))
                    Error(found, field + ": \"" + raw + "\" is not a valid label (letters, digits, _ . - only, at most 32); left out");
                else if (into.Contains(label))
                    Error(found, field + ": \"" + label + "\" is listed twice; kept once");
                else if (into.Count >= MaxLabels)
                    Error(found, field + ": more than " + MaxLabels + " labels; \"" + label + "\" left out");
                else
                {
                    into.Add(label);
                    string description;
                    if (descriptions != null && raw != null && descriptions.TryGetValue(raw, out description)
                        && !string.IsNullOrEmpty(description) && description.Trim().Length > 0)
                    {
                        description = description.Trim();
                        if (description.Length > MaxDescriptionLength)
                        {
                            Error(found, "the description of \"" + label + "\" is over " + MaxDescriptionLength + " characters; cut");
                            description = description.Substring(0, MaxDescriptionLength);
                        }
                        intoDescriptions[label] = description;
                    }
                }
            }
            if (into.Count == 0)
            {
                Error(found, field + " is empty; using [\"" + fallback + "\"]");
                into.Add(fallback);
            }
        }

        static string Default(string value, List<string> names, string field, string listField, List<SpecProblem> found)
        {
            if (string.IsNullOrEmpty(value)) return null;
            string label = value.Trim();
            if (names.Contains(label)) return label;
            Error(found, field + " \"" + value + "\" is not one of " + listField + " [" + string.Join(", ", names.ToArray())
                         + "]; left out");
            return null;
        }

        static void Error(List<SpecProblem> found, string message)
        {
            found.Add(new SpecProblem { IsError = true, Message = message });
        }

        /// <summary>All problems as one line each, for a log.</summary>
        public static string Describe(IEnumerable<SpecProblem> problems)
        {
            var sb = new StringBuilder();
            foreach (var p in problems) sb.Append(p.IsError ? "error: " : "warning: ").Append(p.Message).Append('\n');
            return sb.ToString();
        }
    }
}
